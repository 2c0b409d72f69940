-- title: One user's conversations
-- answers: Which conversations is a user (by identity or user SID) in now, most recently
--   updated first, and what has the user not read?
-- params: $1 user = agent00001
SELECT v.chat_service_sid,
       v.conversation_sid,
       v.friendly_name,
       v.conversation_state,
       v.unread_messages_count,
       v.last_read_message_index,
       v.notification_level,
       v.date_updated
FROM user_conversations_v AS v
JOIN users AS u ON u.chat_service_sid = v.chat_service_sid AND u.user_sid = v.user_sid
WHERE $1::text IN (u.identity, u.user_sid)
ORDER BY v.date_updated DESC NULLS LAST, v.chat_service_sid, v.conversation_sid;
